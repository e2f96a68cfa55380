"""Federated learning: malicious clients, server-side defenses and Lockdown, as one more experiment kind.

A grid with a `federated:` section trains its victim by federation instead of centrally
(`bdbench.federated.simulation`); the rest of the experiment (precision, post-training defense, scoring, rows)
is the centralized one. `aggregation` holds the server rules,
`lockdown` Lockdown's masks and fusion, `flame` and `fltrust` those two server defenses, `clients`
the vectorised local training, `split` the IID and Dirichlet shares.
"""

from bdbench.federated import flame, fltrust, lockdown  # noqa: F401  (register flame, fltrust, lockdown)
from bdbench.federated.aggregation import SERVER_DEFENSES, RoundContext, ServerDefense
from bdbench.federated.config import DirichletSplit, FederatedConfig

__all__ = ["SERVER_DEFENSES", "DirichletSplit", "FederatedConfig", "RoundContext", "ServerDefense"]
