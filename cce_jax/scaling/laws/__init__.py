"""Scaling laws: one module per family, each a `Law` (base.py); `LAWS` maps names to laws."""

from cce_jax.scaling.laws.base import Law as Law
from cce_jax.scaling.laws.chinchilla import CHINCHILLA as CHINCHILLA
from cce_jax.scaling.laws.chinchilla import CHINCHILLA_TIED as CHINCHILLA_TIED
from cce_jax.scaling.laws.bivariate import BIVARIATE as BIVARIATE
from cce_jax.scaling.laws.bivariate import bivariate_law as bivariate_law
from cce_jax.scaling.laws.data_constrained import DATA_CONSTRAINED as DATA_CONSTRAINED
from cce_jax.scaling.laws.data_constrained import MUENNIGHOFF_DECAY as MUENNIGHOFF_DECAY
from cce_jax.scaling.laws.data_constrained import data_constrained_law as data_constrained_law
from cce_jax.scaling.laws.kaplan import KAPLAN as KAPLAN
from cce_jax.scaling.laws.lr_schedule import ScheduleLaw as ScheduleLaw
from cce_jax.scaling.laws.lr_schedule import lr_annealing_law as lr_annealing_law
from cce_jax.scaling.laws.lr_schedule import multi_power_law as multi_power_law
from cce_jax.scaling.laws.overtraining import DOWNSTREAM_ERROR as DOWNSTREAM_ERROR
from cce_jax.scaling.laws.overtraining import OVERTRAINING as OVERTRAINING
from cce_jax.scaling.laws.saturating import SATURATING as SATURATING

LAWS = {law.name: law for law in (CHINCHILLA, CHINCHILLA_TIED)}
LAWS.update({law.name: law for law in (KAPLAN, SATURATING, BIVARIATE, DATA_CONSTRAINED, MUENNIGHOFF_DECAY,
                                        OVERTRAINING, DOWNSTREAM_ERROR)})
# The schedule laws (lr_schedule.py) are built for given LR schedules: lr_annealing_law(...), multi_power_law(...).


def get_law(name: str) -> Law:
  if name not in LAWS:
    raise ValueError(f"unknown law {name!r}; choose from {sorted(LAWS)}")
  return LAWS[name]
