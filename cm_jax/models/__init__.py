"""Noise-conditional networks F(x, c_noise, cond) and their config factory."""

import dataclasses

import flax
import flax.linen as nn

from cm_jax.models.adm import ADM
from cm_jax.models.autoencoder import AutoencoderKL
from cm_jax.models.dit import DiT
from cm_jax.models.mlp import MLP
from cm_jax.models.ncsnpp import NCSNpp
from cm_jax.models import sd_unet
from cm_jax.models.unet import UNet

MODELS = {'unet': UNet, 'mlp': MLP, 'ncsnpp': NCSNpp, 'adm': ADM, 'dit': DiT, 'autoencoder_kl': AutoencoderKL,
          'sd_unet': sd_unet.TextUNet}
# model.name='sd_unet': a diffusers UNet2DConditionModel (Stable Diffusion) conditioned on text. Its fields:
SD_UNET_FIELDS = ('unet', 'guidance_embedding', 'guidance_dim', 'dtype', 'remat', 'attention_kernel')


def build_model(model_config, unet_config=None) -> nn.Module:
  """Builds MODELS[config.name] from the remaining config fields, strictly.

  Args:
    model_config: a mapping (dict or ml_collections.ConfigDict) with `name`
      and any of the chosen network's attributes. For 'sd_unet' (SD_UNET_FIELDS): `unet` is the diffusers
      UNet2DConditionModel config (a dict; empty: `unet_config`, the pipeline's), the rest as sd_unet.text_unet.
    unet_config: the diffusers UNet config of the run's pipeline (latent.pipeline), or None.

  Raises:
    ValueError: on an unknown name or a field the network does not have.
  """
  fields = dict(model_config)
  name = fields.pop('name', None)
  if name == 'sd_unet':
    unknown = sorted(set(fields) - set(SD_UNET_FIELDS))
    if unknown:
      raise ValueError(f"Unknown field(s) {unknown} for model 'sd_unet'; known: {sorted(SD_UNET_FIELDS)}.")
    config = dict(fields.pop('unet', None) or {}) or unet_config
    if not config:
      raise ValueError("model.name='sd_unet' needs its architecture: model.unet (a diffusers UNet2DConditionModel "
                       'config) or latent.pipeline (a diffusers pipeline folder).')
    return sd_unet.text_unet(dict(config, _class_name=sd_unet.CLASS_NAME), 'model.unet', **fields)
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r}; known: {sorted(MODELS)}.')
  cls = MODELS[name]
  known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}; '
                     f'known: {sorted(known)}.')
  return cls(**{k: tuple(v) if isinstance(v, list) else v
                for k, v in fields.items()})


def init_from_teacher(params, teacher):
  """`params` with every entry the teacher has replaced by the teacher's (teacher.init).

  The entries the teacher lacks (a student's guidance embedding, zero-initialised) keep their initial values, so a
  guidance-input student starts as its unguided teacher.

  Raises:
    ValueError: when the teacher has parameters this network does not.
  """
  flat, flat_teacher = (flax.traverse_util.flatten_dict(p, sep='/') for p in (params, teacher))
  extra = sorted(set(flat_teacher) - set(flat))
  if extra:
    raise ValueError(f'The teacher has parameters {extra} that this network (config.model) does not have.')
  return flax.traverse_util.unflatten_dict({**flat, **flat_teacher}, sep='/')
