"""Loading: model references -> components (hub id, folder, single file, random:, bundled:),
precision per component, tiny decoders."""
