"""How busy a peer is, for whoever ranks peers: the destroy listener's tracker
(sources/lifecycle_peers.py), which keeps the busiest pairs, and the host-wide budget
(peer_budget.py), which gives them rows.

Closes (or connects), halved every SCORE_HALF_LIFE_SECONDS, a failed connection weighing
FAILURE_WEIGHT of them: so a destination that fails now and then keeps its row beside busy
healthy ones, and C01 can judge it by name rather than under "other".
"""

SCORE_HALF_LIFE_SECONDS = 60.0
FAILURE_WEIGHT = 20
