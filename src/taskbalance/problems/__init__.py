"""Reference problems with known answers, to check methods against published results."""

from taskbalance.problems.kendall import (
    PUBLISHED_SIGMA,
    TRUE_SIGMA,
    KendallNet,
    KendallResult,
    make_data,
    plot_sigma,
    run_kendall,
)

#: problem name -> one-line description (listed by ``taskbalance list``).
PROBLEMS: dict[str, str] = {
    "kendall": "Kendall et al. (CVPR 2018) toy: two regressions with noise 10 and 1, "
    "uncertainty weighting must learn sigma near (8.59, 0.92)",
    "mmoe": "Ma et al. (KDD 2018) synthetic regression pair with task correlation p: "
    "shared-bottom vs OMoE vs MMoE",
    "gradnorm": "Chen et al. (ICML 2018) synthetic regressions sigma_i tanh((B + eps_i) x): "
    "GradNorm vs equal weighting on sum_i L_i(t)/L_i(0)",
    "mmoe_census": "Ma et al. (KDD 2018) Census-Income groups 1 and 2: single-task, "
    "shared-bottom, OMoE and MMoE test AUC next to the paper's Tables 1-2 (data fetched from "
    "the package registry)",
}

__all__ = [
    "PROBLEMS",
    "PUBLISHED_SIGMA",
    "TRUE_SIGMA",
    "KendallNet",
    "KendallResult",
    "make_data",
    "plot_sigma",
    "run_kendall",
]
