"""Policy evaluation inside the world model, checked against the simulator (paper App. C).

Data flow:  simulator.py (closed-loop rollouts in pybullet, ground-truth state)
         -> progress.py  (staged task progress from that state)
         -> policies.py  (policies of graded quality, behind the interact controller contract)
         -> ranking.py   (Pearson / Spearman / MMRV / false-success rate, bootstrap intervals)
         -> cli.py       (``persistworld policy-eval``)
"""
