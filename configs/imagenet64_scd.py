"""sCD on class-conditional ImageNet-64 (Lu and Song 2024): distils a TrigFlow teacher with imagenet64_sct's network
(configs/imagenet64_trigflow.py; model fields identical except dropout), initialised from it.

Command:
  python -m cm_jax.main --config=configs/imagenet64_scd.py --workdir=runs/imagenet64_scd \
      --config.teacher.workdir=runs/imagenet64_trigflow
Hardware: a TPU slice or GPU node (sized like imagenet64_cd_lpips: 64 GPUs); not run in this project.
Batch 2048, 400k iterations (imagenet64_sct's; unverified).
Paper FID: 1 step 2.44, 2 steps 1.66 (sCD-XL). Not reproduced here (EDM2-XL networks in the paper).
Settings: as imagenet64_sct with dx_t/dt from the teacher and dropout 0; guidance off (s = 1). For a guided
teacher set model.label_dropout > 0 in both runs (label -1 is the unconditional branch) and
objective.guidance_scale=(lo, hi).
"""

from configs import imagenet64_sct


def get_config():
  c = imagenet64_sct.get_config()
  c.objective.name = 'scd'
  c.objective.teacher = 'trigflow'
  c.objective.guidance_scale = (1.0, 1.0)
  c.model.dropout = 0.0
  c.teacher.init = True
  return c
