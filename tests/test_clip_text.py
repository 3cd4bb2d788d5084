"""The Flax CLIP text encoders (models/clip_text.py) against transformers' PyTorch CLIPTextModel and
CLIPTextModelWithProjection: tiny random configs with perturbed weights, saved by save_pretrained; every hidden state,
last_hidden_state, the pooled end-of-text state (both eos rules) and text_embeds. Also the key layouts (transformers
5's unprefixed CLIPTextModel, the Hub's 'text_model.' prefix with the position_ids buffer, the fp16 variant file name,
sharded files), a tiny real CLIP BPE tokenizer (vocab.json + merges.txt written here) with tokenize()'s padding and
truncation, and the errors of a wrong architecture or a tokenizer folder without its vocabulary.
"""

import json
import logging

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from cm_jax.models import clip_text

LETTERS = 'abcdefghijklmnopqrstuvwxyz'
MERGES = ('t h', 'th e</w>', 'c a', 'ca t</w>', 'o f</w>', 'd o', 'do g</w>')
PROMPTS = ('the cat', 'a photo of the dog', 'dog, cat. the end', '')
MAX_LENGTH = 77


def _vocab() -> dict:
  """CLIP's BPE vocabulary layout, tiny: characters, characters ending a word ('</w>'), merges, then the specials."""
  tokens = list(LETTERS + ',.') + [c + '</w>' for c in LETTERS + ',.']
  tokens += [m.replace(' ', '') for m in MERGES] + ['<|startoftext|>', '<|endoftext|>']
  return {t: i for i, t in enumerate(tokens)}


def _write_tokenizer(folder):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'vocab.json').write_text(json.dumps(_vocab()))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(MERGES) + '\n')
  return folder


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  pytest.importorskip('transformers')
  return clip_text.load_tokenizer(_write_tokenizer(tmp_path_factory.mktemp('tokenizer')))


def _torch_model(architecture, hidden_act, eos_token_id, layer_norm_eps, seed):
  """A tiny transformers CLIP text model with every weight perturbed (so no parameter is left at its init)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = transformers.CLIPTextConfig(
      vocab_size=len(_vocab()), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
      max_position_embeddings=MAX_LENGTH, projection_dim=24, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
      bos_token_id=len(_vocab()) - 2, eos_token_id=eos_token_id, pad_token_id=len(_vocab()) - 1)
  torch.manual_seed(seed)
  model = getattr(transformers, architecture)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.3 * torch.randn_like(p) + (0.5 if 'norm' in name and name.endswith('weight') else 0.0))
  return model


def _torch_outputs(model, ids) -> dict:
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    out = model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
  text_model = getattr(model, 'text_model', model)
  pooled = text_model(torch.as_tensor(ids, dtype=torch.long)).pooler_output
  return {'hidden_states': [h.numpy() for h in out.hidden_states], 'last_hidden_state': out.last_hidden_state.numpy(),
          'pooled': pooled.detach().numpy(),
          'text_embeds': out.text_embeds.numpy() if 'text_embeds' in out else None}


def _relative_error(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _assert_close(ours: dict, theirs: dict, rtol=1e-5):
  assert len(ours['hidden_states']) == len(theirs['hidden_states'])
  for i, (a, b) in enumerate(zip(ours['hidden_states'], theirs['hidden_states'])):
    assert _relative_error(a, b) < rtol, f'hidden_states[{i}]'
  for key in ('last_hidden_state', 'pooled', 'text_embeds'):
    if theirs[key] is None:
      assert ours[key] is None, key
    else:
      assert _relative_error(ours[key], theirs[key]) < rtol, key


CASES = {  # architecture, hidden_act, eos_token_id (2: the legacy argmax rule; None: the tokenizer's), layer_norm_eps
    'sd1_legacy_eos': ('CLIPTextModel', 'quick_gelu', 2, 1e-5),
    'sd2_gelu': ('CLIPTextModel', 'gelu', None, 1e-3),
    'projection': ('CLIPTextModelWithProjection', 'gelu', None, 1e-5),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_equals_transformers(case, tokenizer, tmp_path):
  architecture, hidden_act, eos, eps = CASES[case]
  model = _torch_model(architecture, hidden_act, tokenizer.eos_token_id if eos is None else eos, eps, seed=len(case))
  model.save_pretrained(tmp_path, safe_serialization=True)
  encoder = clip_text.load_text_encoder(tmp_path)
  ids = clip_text.tokenize(tokenizer, PROMPTS)
  ours, theirs = encoder(ids), _torch_outputs(model, ids)
  _assert_close(ours, theirs)
  # Random ids, where the two eos rules differ: end-of-text at a random place, twice, or not at all (position 0).
  random_ids = np.random.default_rng(0).integers(0, len(_vocab()) - 1, (3, MAX_LENGTH)).astype(np.int32)
  random_ids[0, [9, 30]] = random_ids[1, 50] = tokenizer.eos_token_id
  _assert_close(encoder(random_ids), _torch_outputs(model, random_ids))
  assert ours['hidden_states'][-2].shape == (len(PROMPTS), MAX_LENGTH, 32)  # SD2's penultimate layer
  if architecture == 'CLIPTextModelWithProjection':
    assert ours['text_embeds'].shape == (len(PROMPTS), 24)


def test_both_eos_rules_pick_the_end_of_text_token(tokenizer, tmp_path):
  """With the pad token = eos, both rules pick the first <|endoftext|>; the two configs then pool the same state."""
  model = _torch_model('CLIPTextModel', 'quick_gelu', 2, 1e-5, seed=0)
  ids = clip_text.tokenize(tokenizer, PROMPTS)
  model.save_pretrained(tmp_path / 'legacy', safe_serialization=True)
  model.config.eos_token_id = tokenizer.eos_token_id
  model.save_pretrained(tmp_path / 'first', safe_serialization=True)
  legacy, first = (clip_text.load_text_encoder(tmp_path / name)(ids) for name in ('legacy', 'first'))
  np.testing.assert_array_equal(legacy['pooled'], first['pooled'])
  eos_position = np.argmax(ids == tokenizer.eos_token_id, axis=-1)
  np.testing.assert_array_equal(first['pooled'], first['last_hidden_state'][np.arange(len(ids)), eos_position])


def test_key_layouts_and_file_variants(tokenizer, tmp_path):
  """transformers 5 saves a bare CLIPTextModel without 'text_model.'; the Hub's folders have it (and often the
  position_ids buffer); model.fp16.safetensors and sharded files are read too. All load to the same encoder."""
  model = _torch_model('CLIPTextModel', 'quick_gelu', tokenizer.eos_token_id, 1e-5, seed=3)
  model.save_pretrained(tmp_path / 'plain', safe_serialization=True)
  tensors = safetensors_numpy.load_file(str(tmp_path / 'plain' / 'model.safetensors'))
  assert not any(k.startswith('text_model.') for k in tensors)
  hub = tmp_path / 'hub'
  hub.mkdir()
  (hub / 'config.json').write_text((tmp_path / 'plain' / 'config.json').read_text())
  prefixed = {'text_model.' + k: v for k, v in tensors.items()}
  prefixed['text_model.embeddings.position_ids'] = np.arange(MAX_LENGTH, dtype=np.int64)[None]
  safetensors_numpy.save_file(prefixed, str(hub / 'model.fp16.safetensors'))
  model.save_pretrained(tmp_path / 'sharded', safe_serialization=True, max_shard_size='20KB')
  assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
  ids = clip_text.tokenize(tokenizer, PROMPTS)
  reference = clip_text.load_text_encoder(tmp_path / 'plain')(ids)
  for name in ('hub', 'sharded'):
    other = clip_text.load_text_encoder(tmp_path / name)(ids)
    np.testing.assert_array_equal(other['last_hidden_state'], reference['last_hidden_state'])


def test_tokenize_pads_and_truncates_like_the_tokenizer(tokenizer, caplog):
  ids = clip_text.tokenize(tokenizer, PROMPTS)
  expected = tokenizer(list(PROMPTS), padding='max_length', max_length=MAX_LENGTH, truncation=True)['input_ids']
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), MAX_LENGTH)
  np.testing.assert_array_equal(ids, expected)
  vocab = _vocab()
  np.testing.assert_array_equal(ids[0, :4], [vocab['<|startoftext|>'], vocab['the</w>'], vocab['cat</w>'],
                                             vocab['<|endoftext|>']])
  long_prompts = ['the cat ' * 50, 'the dog', 'a dog ' * 40]
  with caplog.at_level(logging.WARNING):
    ids = clip_text.tokenize(tokenizer, long_prompts)
  warnings = [r.getMessage() for r in caplog.records if 'truncated' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith('2 of 3 prompts'), warnings
  expected = tokenizer(long_prompts, padding='max_length', max_length=MAX_LENGTH, truncation=True)['input_ids']
  np.testing.assert_array_equal(ids, expected)
  assert ids[0, -1] == tokenizer.eos_token_id


def test_wrong_architecture_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['CLIPVisionModel']}))
  with pytest.raises(ValueError, match='CLIPVisionModel'):
    clip_text.load_text_encoder(tmp_path)


def test_tokenizer_without_vocabulary_is_refused(tmp_path):
  _write_tokenizer(tmp_path)
  (tmp_path / 'vocab.json').unlink()
  with pytest.raises(ValueError, match='vocab.json'):
    clip_text.load_tokenizer(tmp_path)


def test_too_long_ids_are_refused(tmp_path):
  model = _torch_model('CLIPTextModel', 'quick_gelu', 2, 1e-5, seed=0)
  model.save_pretrained(tmp_path, safe_serialization=True)
  with pytest.raises(ValueError, match='more than the 77 positions'):
    clip_text.load_text_encoder(tmp_path)(np.zeros((1, MAX_LENGTH + 1), np.int32))
