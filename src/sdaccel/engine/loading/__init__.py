"""Loading: model references -> components (hub id, folder, single file, random:, bundled:),
the CLIP tokenizer built offline, precision per component, tiny decoders."""
