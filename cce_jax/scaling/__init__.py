"""Scaling-law fitting: laws, a batched multi-start L-BFGS fitter, bootstrap, compute-optimal allocation."""

from cce_jax.scaling.allocation import chinchilla_optimum as chinchilla_optimum
from cce_jax.scaling.allocation import numeric_optimum as numeric_optimum
from cce_jax.scaling.bootstrap import BootstrapResult as BootstrapResult
from cce_jax.scaling.bootstrap import bootstrap_fit as bootstrap_fit
from cce_jax.scaling.bootstrap import chinchilla_exponents as chinchilla_exponents
from cce_jax.scaling.bootstrap import pairs_bootstrap as pairs_bootstrap
from cce_jax.scaling.bootstrap import percentile_interval as percentile_interval
from cce_jax.scaling.fitting import FitResult as FitResult
from cce_jax.scaling.fitting import LbfgsResult as LbfgsResult
from cce_jax.scaling.fitting import fit as fit
from cce_jax.scaling.fitting import lbfgs as lbfgs
from cce_jax.scaling.laws import CHINCHILLA as CHINCHILLA
from cce_jax.scaling.laws import CHINCHILLA_TIED as CHINCHILLA_TIED
from cce_jax.scaling.laws import LAWS as LAWS
from cce_jax.scaling.laws import get_law as get_law
