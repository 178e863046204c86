"""hubload's model zoo, importable as ``hubload.zoo``: hand-written "twin" architectures, apart from the loading
code in ``hubload.adapters``, kept only where no installable library class exists here.

- :mod:`hubload.zoo.torch_models` / :mod:`hubload.zoo.keras_models`: the seed MLP (the offline demo), ResNet-18/50
  with torchvision's parameter names (torchvision's wheels here need a CUDA build of torch), and ``mean_pool``
  (sentence-transformers' mean pooling, for the BERT encoders' hidden states).
  BERT has no twin: registry entries build transformers' ``BertModel`` and keras-hub's ``BertBackbone`` (see
  :mod:`hubload.families`).

Each module imports its framework at the top; importing it is the opt-in.
"""
