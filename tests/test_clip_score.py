"""The CLIP score (evaluation/clip_score.py) and the Flax CLIP image tower (models/clip_vision.py) against
transformers: a tiny random CLIPModel with perturbed weights (hidden 32, 2 layers, 32 px images of 8 px patches; the
image tower with gelu, the text tower with quick_gelu), saved by save_pretrained with a CLIP BPE tokenizer in the same
folder. Image embeds (CLIPModel and CLIPVisionModelWithProjection folders), text embeds, the preprocessing against
transformers' PIL CLIP image processor, the score against 100 max(cos, 0) in numpy on transformers' features; the
errors of a missing, corrupt or other-model folder; --mode=fid's clip_score on a digits text-to-image run.
"""

import json

import jax
import numpy as np
import pytest

from cm_jax.data import captions
from cm_jax.models import clip_text
from cm_jax.models import clip_vision

PROMPTS = [captions.digit_caption(d, p) for d, p in ((7, 0), (1, 1), (3, 2), (0, 0), (9, 1), (4, 2))]


def _words():
  return sorted({w for p in PROMPTS for w in p.lower().replace(',', ' ').split()} | {'digit', 'eight'})


def _perturb(model, seed):
  torch = pytest.importorskip('torch')
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.3 * torch.randn_like(p) + (0.5 if 'norm' in name and name.endswith('weight') else 0.0))
  return model.eval()


def _vision_config(transformers, hidden_act):
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=24, hidden_act=hidden_act)


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
  """(folder, torch CLIPModel, its tokenizer) of a tiny random CLIP with the tokenizer files beside the weights."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  folder = tmp_path_factory.mktemp('clip')
  tokenizer = clip_text.load_tokenizer(clip_text.write_tokenizer(folder, _words()))
  text = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      projection_dim=24, hidden_act='quick_gelu', bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  vision = _vision_config(transformers, 'gelu')
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
  model = _perturb(transformers.CLIPModel(config), seed=0)
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model, tokenizer


def _relative_error(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _torch_image_embeds(model, pixels):
  """get_image_features of NHWC pixels (transformers' CLIPModel or CLIPVisionModelWithProjection)."""
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    pixel_values = torch.as_tensor(np.asarray(pixels).transpose(0, 3, 1, 2).copy())
    if hasattr(model, 'get_image_features'):
      return model.get_image_features(pixel_values=pixel_values).pooler_output.numpy()
    return model(pixel_values=pixel_values).image_embeds.numpy()


def _torch_text_embeds(model, tokenizer, prompts):
  """get_text_features as torchmetrics calls it: the prompts padded to the longest, with the attention mask."""
  torch = pytest.importorskip('torch')
  batch = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors='pt')
  with torch.no_grad():
    return model.get_text_features(input_ids=batch['input_ids'],
                                   attention_mask=batch['attention_mask']).pooler_output.numpy()


def test_image_and_text_embeds_equal_transformers(clip_folder, tmp_path):
  folder, model, tokenizer = clip_folder
  image, text = clip_vision.load_clip(folder)
  pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  ours = image(pixels)
  assert ours['image_embeds'].shape == (3, 24) and len(ours['hidden_states']) == 3
  assert _relative_error(ours['image_embeds'], _torch_image_embeds(model, pixels)) < 1e-5
  ids = clip_text.tokenize(tokenizer, PROMPTS)
  assert _relative_error(text(ids)['text_embeds'], _torch_text_embeds(model, tokenizer, PROMPTS)) < 1e-5
  # A CLIPVisionModelWithProjection folder, with quick_gelu.
  transformers = pytest.importorskip('transformers')
  vision = _perturb(transformers.CLIPVisionModelWithProjection(_vision_config(transformers, 'quick_gelu')), seed=1)
  vision.save_pretrained(tmp_path, safe_serialization=True)
  encoder = clip_vision.load_image_encoder(tmp_path)
  assert _relative_error(encoder(pixels)['image_embeds'], _torch_image_embeds(vision, pixels)) < 1e-5
  with pytest.raises(ValueError, match='not a CLIPModel'):
    clip_vision.load_clip(tmp_path)
  with pytest.raises(ValueError, match='reads 32x32'):
    encoder(pixels[:, :16])


@pytest.mark.parametrize('shape', [(2, 8, 8, 1), (2, 13, 20, 3), (1, 45, 40, 3)])
def test_preprocess_equals_clip_image_processor(shape):
  """Grey 8x8 digits upsampled, a wide and a tall image (cropped), against transformers' PIL image processor."""
  transformers = pytest.importorskip('transformers')
  processor = transformers.CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
  images = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.uint8)
  expected = processor([np.repeat(x, 3, -1) if x.shape[-1] == 1 else x for x in images],
                       return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  ours = np.asarray(clip_vision.preprocess(images / 255.0, 32))
  assert ours.shape == expected.shape
  lsb = 1 / 255 / min(clip_vision.STD)  # one 8-bit step after normalisation
  error = np.abs(ours - expected)
  assert error.max() <= 1.01 * lsb and error.mean() < 0.05 * lsb, (error.max() / lsb, error.mean() / lsb)


def test_score_is_100_max_cos_0_on_transformers_features(clip_folder):
  from cm_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  folder, model, tokenizer = clip_folder
  scorer = clip_score.load(folder)
  images = np.random.default_rng(1).uniform(-1, 1, (len(PROMPTS), 32, 32, 3)).astype(np.float32)
  ids = scorer.tokenize(PROMPTS)
  ours = np.asarray(jax.jit(scorer.scores)(scorer.params, images, ids))
  # numpy: the 8-bit pixels, CLIP's normalisation, transformers' features, 100 max(cos, 0).
  pixels = (np.clip(np.floor(127.5 * images + 128.0), 0, 255) / 255.0 - clip_vision.MEAN) / clip_vision.STD
  e_img = _torch_image_embeds(model, pixels.astype(np.float32))
  e_txt = _torch_text_embeds(model, tokenizer, PROMPTS)
  cos = (e_img * e_txt).sum(-1) / np.linalg.norm(e_img, axis=-1) / np.linalg.norm(e_txt, axis=-1)
  assert (cos < 0).any() and (cos > 0).any(), cos  # the clamp matters here
  np.testing.assert_allclose(ours, 100.0 * np.maximum(cos, 0.0), rtol=1e-5, atol=1e-4)


def test_missing_corrupt_or_other_clip_folders_are_one_line_errors(clip_folder, tmp_path):
  from cm_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  folder = clip_folder[0]
  missing = tmp_path / 'no_such_clip'
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  for name in ('config.json', 'vocab.json', 'merges.txt'):
    (corrupt / name).write_text((folder / name).read_text())
  (corrupt / 'model.safetensors').write_bytes(b'not a safetensors file')
  text_only = tmp_path / 'text_only'
  text_only.mkdir()
  (text_only / 'config.json').write_text(json.dumps({'architectures': ['CLIPTextModelWithProjection']}))
  no_tokenizer = tmp_path / 'no_tokenizer'
  no_tokenizer.mkdir()
  for name in ('config.json', 'model.safetensors'):
    (no_tokenizer / name).write_bytes((folder / name).read_bytes())
  cases = ((missing, FileNotFoundError, 'no_such_clip does not exist'),
           (corrupt, ValueError, 'corrupt/model.safetensors'),
           (text_only, ValueError, "text_only/config.json describes \\['CLIPTextModelWithProjection'\\]"),
           (no_tokenizer, ValueError, 'no_tokenizer lacks vocab.json'))
  for path, error, words in cases:
    with pytest.raises(error, match=words) as info:
      clip_score.load(path)
    assert '\n' not in str(info.value)


def test_mode_fid_writes_the_clip_score_of_a_digits_text_to_image_run(clip_folder, tmp_path, monkeypatch):
  """fid.run on a digits text-to-image run (its initial state checkpointed: no training needed) with eval.clip.model:
  fid.json's clip_score is the numpy formula on transformers' features of the same samples and captions."""
  from cm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from cm_jax import digits_pipeline  # pylint: disable=g-import-not-at-top
  from cm_jax import experiment  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import digits_proxy  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  from configs import digits_t2i_ddpm  # pylint: disable=g-import-not-at-top
  folder, model, tokenizer = clip_folder
  monkeypatch.setattr(digits_pipeline, 'CACHE_DIR', str(tmp_path / 'cache'))
  config = digits_t2i_ddpm.get_config()
  config.train.batch_size, config.sampling.teacher_steps = 8, 2
  config.eval.fid.update(dict(extractor='digits', num_samples=12))
  config.eval.clip.model = str(folder)
  workdir = tmp_path / 'run'
  devices = jax.devices()[:1]
  exp = experiment.Experiment(config, devices)
  state = exp.init_state()
  ckpt = checkpoint.Checkpointer(workdir, writer=True)
  ckpt.save(0, state, {}, force=True)
  ckpt.wait()
  ckpt.close()
  digits_proxy.DigitsProxy.train(seed=0, steps=20).save(workdir / 'proxy_classifier.msgpack')  # not the 400-step one
  report = fid.run(config, str(workdir), devices)
  row = report['results'][exp.sampler.label(2)]
  assert json.loads((workdir / 'fid.json').read_text())['results'] == report['results']
  # Independently: the same 12 samples (eval.fid's seed, batches of 8) and the run's captions in order, through
  # transformers' towers and the numpy formula.
  samples = exp.generate(state.ema[0], 12, 2, seed=config.eval.fid.seed)
  pixels = np.asarray(clip_vision.preprocess(np.asarray(fid.quantize(samples)) / 255.0, 32))
  e_img, e_txt = _torch_image_embeds(model, pixels), _torch_text_embeds(model, tokenizer, exp.prompt_texts(12))
  cos = (e_img * e_txt).sum(-1) / np.linalg.norm(e_img, axis=-1) / np.linalg.norm(e_txt, axis=-1)
  scores = 100.0 * np.maximum(cos, 0.0)
  assert row['clip_num_samples'] == 12 and len(set(exp.prompt_texts(12))) > 1
  np.testing.assert_allclose(row['clip_score'], scores.mean(), rtol=1e-4)
  np.testing.assert_allclose(row['clip_score_std'], scores.std(ddof=1), rtol=1e-3)
  assert not list((workdir / 'fid').glob('progress_clip_*'))
  # A run that is not text-to-image is refused before sampling.
  with pytest.raises(ValueError, match='not text-conditioned'):
    clip_score.make_scorer(config, type('Run', (), {'text_conditioned': False})())
