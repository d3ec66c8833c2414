"""Glue for training stacks: `l3rs.integrations.transformers` (Hugging Face Trainer) and
`l3rs.integrations.lightning` (PyTorch Lightning). Each needs its extra: ``pip install l3rs[hf]`` or
``l3rs[lightning]``; import the submodule you use."""
