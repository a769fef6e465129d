"""Training the bundled models, outside the runtime: sdaccel's engine, CLI, server, jobs and bench
never import this package (tests/test_layers.py checks it).

    python -m sdaccel.training.train            the bundled:shapes model (and its tokenizer)
    python -m sdaccel.training.train_lora       the ring LoRA (bundled/loras/ring*.safetensors)
    python -m sdaccel.training.train_lcm        the LCM LoRA (bundled/loras/lcm*.safetensors)
    python -m sdaccel.training.train_embedding  a textual-inversion embedding

The data set and the judge they train and evaluate with are the runtime's (sdaccel.shapes).
"""
