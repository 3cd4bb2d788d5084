"""Released networks used by a run: EDM's network pickles and the CM paper's state dicts (models/checkpoints.py) as
its teacher (teacher.checkpoint) or, with no cm_jax training, as the model it samples and scores (init.checkpoint).

teacher.checkpoint=PATH (instead of teacher.workdir): the file is the run's teacher. A distillation objective (CD,
sCD, the CM paper's continuous-time CD) reads it as an EDM-preconditioned denoiser, so the file must be one (EDM's
EDMPrecond pickles, the CM paper's edm_*_ema.pt); with teacher.init the run starts from the file's weights, and any
EDM pickle serves: ECT tunes EDM's VP pickle (edm-cifar10-32x32-uncond-vp.pkl) by reading its network's weights under
EDM's preconditioning, as locuslab/ect's --transfer does.
init.checkpoint=PATH: --mode=sample|eval|fid|edit read the file as the run's state at step 0 (network, EMAs and target
the file's) in a workdir without checkpoints; --mode=train refuses it (a run starts from a released file through
teacher.checkpoint and teacher.init). The name: model.* are the network's constructor fields (models.build_model
takes them strictly, and the configs replace the section whole), and a reading mode reads a run's step-0 state when
the file is its initialisation: init.checkpoint.

In both, the file's network (its constructor arguments or the CM paper's preset) must be the run's config.model
(experiment.network_fields), its data shape the run's and its sigma_data (for a consistency model also sigma_min and
sigma_max) the run's parameterization's; each mismatch is one ValueError naming both values.
"""

import ml_collections
import numpy as np
from etils import epath

from cm_jax import workdir as workdir_lib

# Where the released files are published (NVlabs/edm README, openai/consistency_models README).
_EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
_CM_URL = 'https://openaipublic.blob.core.windows.net/consistency/'
URLS = {
    **{name: _EDM_URL + name for name in (
        'edm-cifar10-32x32-cond-vp.pkl', 'edm-cifar10-32x32-cond-ve.pkl', 'edm-cifar10-32x32-uncond-vp.pkl',
        'edm-cifar10-32x32-uncond-ve.pkl', 'edm-ffhq-64x64-uncond-vp.pkl', 'edm-ffhq-64x64-uncond-ve.pkl',
        'edm-afhqv2-64x64-uncond-vp.pkl', 'edm-afhqv2-64x64-uncond-ve.pkl', 'edm-imagenet-64x64-cond-adm.pkl')},
    **{name: _CM_URL + name for name in (
        'edm_imagenet64_ema.pt', 'cd_imagenet64_l2.pt', 'cd_imagenet64_lpips.pt', 'ct_imagenet64.pt',
        'edm_bedroom256_ema.pt', 'cd_bedroom256_l2.pt', 'cd_bedroom256_lpips.pt', 'ct_bedroom256.pt',
        'edm_cat256_ema.pt', 'cd_cat256_l2.pt', 'cd_cat256_lpips.pt', 'ct_cat256.pt')},
}
EDM_SUFFIXES = ('.pkl',)
CM_SUFFIXES = ('.pt', '.pth')
COMPUTE = ('dtype', 'remat', 'attention_kernel')  # the run's compute choices, kept on the file's network
_DIFFUSION = ('edm', 'vp', 've')  # preconditioning names of a denoiser (EDM's three, models/checkpoints.py)


def read(key: str, path, config=None, resolution: int = 0, shardings=None):
  """The released network at `path` (config key `key` names it in errors): load_edm for .pkl, load_cm for .pt/.pth
  (read into the network of `config.model` at `resolution` where that is a guided-diffusion UNet, so that a file of
  another architecture is named by its first missing or mis-shaped tensor, and placed tensor by tensor on
  `shardings` (the network's parameter shardings) when given; else the CM paper's presets, as numpy).

  Raises:
    FileNotFoundError: no file at `path`, naming where the file of that name is published.
    ValueError: another suffix, or what the loaders refuse (one line).
  """
  from cm_jax.models import checkpoints  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  if not path.is_file():
    url = URLS.get(path.name)
    where = f'download it from {url}' if url else 'download the released file'
    raise FileNotFoundError(f'{key}={str(path)!r}: no file there; {where} and set --config.{key}=<its path>.')
  if path.suffix in EDM_SUFFIXES:
    return _without_augmentation(checkpoints.load_edm(path), config)
  if path.suffix in CM_SUFFIXES:
    if config is not None and config.model.get('layout') == 'guided_diffusion':
      return checkpoints.load_cm(path, dict(config.model), resolution, shardings=shardings)
    return checkpoints.load_cm(path)
  raise ValueError(f'{key}={str(path)!r}: expected an EDM network pickle ({", ".join(EDM_SUFFIXES)}) or a CM-paper '
                   f'state dict ({", ".join(CM_SUFFIXES)}).')


def _without_augmentation(net, config):
  """EDM's network without its augmentation input where the run's network has none (ECT tunes the augmentation-
  trained CIFAR-10 pickle so): EDM's map_augment is bias-free, so with no augmentation labels it adds nothing."""
  if config is None or not net.model_config['augment_dim'] or config.model.get('augment_dim', 0):
    return net
  params = {k: v for k, v in net.params.items() if k != 'map_augment'}
  return net._replace(model_config=dict(net.model_config, augment_dim=0), params=params)


def is_diffusion(net) -> bool:
  """Whether the released network is a denoiser D (EDM's networks, edm_*_ema.pt), not a consistency model f."""
  return net.preconditioning['name'] in _DIFFUSION


def experiment_config(config, net):
  """The config of the Experiment that runs the released `net` beside `config`'s run: the file's network with the
  run's compute choices, EDM's parameterization with the file's sigma_data (a consistency model: also its sigma_min
  and sigma_max), objective 'edm' for a denoiser (its Heun sampler) and the run's own for a consistency model; no
  teacher, adapters or release of its own."""
  p = net.preconditioning
  c = config.copy_and_resolve_references()
  with c.unlocked():
    compute = {k: config.model[k] for k in COMPUTE if k in config.model}
    c.model = ml_collections.ConfigDict(dict(net.model_config, **compute))
    run_p = config.parameterization
    sigmas = (run_p.get('sigma_min', 0.002), run_p.get('sigma_max', 80.0)) if run_p.name == 'edm' else (0.002, 80.0)
    if not is_diffusion(net):
      sigmas = (p['sigma_min'], p['sigma_max'])
    c.parameterization = ml_collections.ConfigDict(dict(
        name='edm', sigma_data=float(p.get('sigma_data', 0.5)), sigma_min=float(sigmas[0]),
        sigma_max=float(sigmas[1]), rho=float(run_p.get('rho', 7.0))))
    if is_diffusion(net):
      c.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2))
    c.lora.rank = 0
    c.teacher = ml_collections.ConfigDict(dict(workdir='', checkpoint='', init=False))
    c.init = ml_collections.ConfigDict(dict(checkpoint=''))
  return c


def _what(net) -> str:
  p = net.preconditioning
  kind = {'edm': "EDM's EDMPrecond", 'vp': "EDM's VPPrecond", 've': "EDM's VEPrecond",
          'consistency': 'consistency-model'}[p['name']]
  return f'a {kind} {net.model_config["name"]} network of {p["resolution"]}x{p["resolution"]}x{p["channels"]} images'


def check(key: str, path, net, exp, use: str) -> None:
  """Refuses a released `net` that `exp`'s run cannot read where `use` reads it: another network (the first
  differing field, both values), data shape, space or sigma_data, or (a consistency model) sigma_min / sigma_max."""
  from cm_jax import experiment  # pylint: disable=g-import-not-at-top
  from cm_jax import models  # pylint: disable=g-import-not-at-top
  where = f'{key}={str(path)!r} ({_what(net)})'
  space = exp.space.describe()
  p = net.preconditioning
  shape = (p['resolution'], p['resolution'], p['channels'])
  if space['space'] != 'pixels' or tuple(exp.shape) != shape:
    raise ValueError(f'{where}: {use} needs the run\'s data to be {"x".join(map(str, shape))} pixels; this run works '
                     f'in {space["space"]} of shape {"x".join(map(str, exp.shape))}.')
  file_fields = experiment.network_fields(models.build_model(net.model_config))
  run_fields = experiment.network_fields(exp.model)
  for field in sorted(set(file_fields) | set(run_fields)):
    a, b = file_fields.get(field, '(none)'), run_fields.get(field, '(none)')
    if a != b:
      raise ValueError(f'{where}: the file\'s network has {field}={a!r}, this run\'s config.model {field}={b!r}; '
                       f'{use} reads the file into the run\'s network: set config.model to the file\'s.')
  run_p = exp.config.parameterization
  if use != 'distillation' and run_p.name != 'edm':  # a distillation loss reads its teacher in Objective.distils
    raise ValueError(f"{where}: {use} reads it with EDM's scalings, this run has parameterization.name="
                     f"{run_p.name!r}.")
  names = ('sigma_data',) if is_diffusion(net) else ('sigma_data', 'sigma_min', 'sigma_max')
  for name in names:
    if not np.isclose(float(p.get(name, 0.5)), float(run_p[name])):
      raise ValueError(f'{where}: the file has {name}={p.get(name, 0.5)}, this run parameterization.{name}='
                       f'{run_p[name]}; set it to the file\'s.')


def teacher(config, exp):
  """The released teacher of config.teacher.checkpoint for `exp`'s run (experiment.load_teacher with the file in
  place of a run): an experiment.Teacher whose params are the file's (sharded as a restored teacher's) and whose
  Experiment is `experiment_config`'s.

  Raises:
    ValueError: teacher.workdir is set too; a distillation objective and a file that is not an EDM-preconditioned
      denoiser (a consistency model, EDM's VP / VE preconditioning); what `check` and experiment.check_teacher
      refuse.
  """
  from cm_jax import console  # pylint: disable=g-import-not-at-top
  from cm_jax import experiment  # pylint: disable=g-import-not-at-top
  key, path = 'teacher.checkpoint', config.teacher.checkpoint
  if config.teacher.workdir:
    raise ValueError(f'teacher.workdir={config.teacher.workdir!r} and {key}={path!r} both name a teacher: set one.')
  net = read(key, path, config, exp.shape[0], exp.state_sharding.params)
  distils = exp.objective.distils
  if distils is not None and (distils != 'edm' or net.preconditioning['name'] != 'edm'):
    raise ValueError(f'{key}={path!r} holds {_what(net)}; objective.name={config.objective.name!r} reads its '
                     f'diffusion teacher as {distils!r}: a released teacher is an EDMPrecond denoiser read as \'edm\' '
                     "(EDM's edm-*-adm.pkl, the CM paper's edm_*_ema.pt).")
  if distils is not None or config.teacher.init:
    check(key, path, net, exp, 'distillation' if distils is not None else 'teacher.init')
  teacher_exp = experiment.Experiment(experiment_config(config, net), exp.mesh.devices.flatten().tolist())
  experiment.check_teacher(config, exp, teacher_exp, f'{key}={path!r}')
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.device_put(net.params, teacher_exp.state_sharding.params)  # as they are where load_cm placed them
  read_as = '' if net.preconditioning['name'] in ('edm', 'consistency') else ", its weights read under EDM's scalings"
  console.say(f'Teacher: {path} ({_what(net)}{read_as}).')
  return experiment.Teacher(params, teacher_exp)


def initial_state(config, exp):
  """The train state of `exp` at step 0 whose network, EMAs and target are config.init.checkpoint's network (what
  --mode=sample|eval|fid|edit read in place of a checkpoint); its optimiser state and extra parameters are zeros, made
  on their shardings without compiling the network's initialisation (nothing trains from this state)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cm_jax import console  # pylint: disable=g-import-not-at-top
  key, path = 'init.checkpoint', config.init.checkpoint
  net = read(key, path, config, exp.shape[0], exp.state_sharding.params)
  if is_diffusion(net) != exp.sampler.diffusion:
    want = 'a diffusion objective (objective.name=edm)' if is_diffusion(net) else 'a consistency objective'
    raise ValueError(f'{key}={path!r} holds {_what(net)}; sample it with {want}, not objective.name='
                     f'{config.objective.name!r}.')
  if net.preconditioning['name'] in ('vp', 've'):
    raise ValueError(f"{key}={path!r} holds {_what(net)}; cm_jax samples EDM's EDMPrecond networks and consistency "
                     'models, not the VP / VE preconditionings (they serve as teacher.init weights only).')
  check(key, path, net, exp, 'the sampler')
  if jax.tree.structure(net.params) != jax.tree.structure(exp.abstract_state.params):
    raise ValueError(f'{key}={path!r}: the file\'s parameters are not the tree of the run\'s network (a guidance '
                     'input or another addition of config.model?).')
  params = jax.device_put(net.params, exp.state_sharding.params)
  state = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), exp.abstract_state)
  console.say(f'Model: {path} ({_what(net)}), no cm_jax training.')
  return state.replace(params=params, ema=tuple(params for _ in state.ema),
                       target=None if state.target is None else params)


def check_workdir(config, workdir, mode: str) -> None:
  """What --mode=`mode` with init.checkpoint set needs of the workdir, before anything is written: a reading mode
  (workdir.READS_A_RUN), a workdir that a run could write (workdir.check's entries) without checkpoints of its own
  (the model is the file's, not a run's).

  Raises:
    ValueError: --mode=train or encode; a workdir that holds checkpoints; what workdir.check refuses.
  """
  key, path = 'init.checkpoint', config.init.checkpoint
  if mode not in workdir_lib.READS_A_RUN:
    raise ValueError(f'{key}={path!r} is the model of --mode=sample|eval|fid|edit; to train from a released file set '
                     'teacher.checkpoint (with teacher.init=True) instead.')
  workdir_lib.check(workdir, 'train')
  if (epath.Path(workdir) / 'checkpoints').is_dir():
    raise ValueError(f'--workdir={workdir} holds a run\'s checkpoints, and {key}={path!r} names the model to read: '
                     f'unset {key} to read the run, or choose a new --workdir for the released file.')
