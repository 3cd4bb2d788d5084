"""The PyTorch state-dict reader, now in cm_jax.formats.torch_pickle (one home for foreign formats); this name stays
for its importers."""

from cm_jax.formats.torch_pickle import load_state_dict  # noqa: F401
