"""Policy evaluation inside the world model, checked against the simulator (paper App. C).

Data flow:  simulator.py (closed-loop rollouts in pybullet, ground-truth state)
         -> progress.py  (staged task progress from that state: the one set of stage rules)
         -> policies.py  (policies of graded quality behind the interact controller contract;
                          bc.py: behaviour-cloning vision policies)
         -> judge.py     (the state read from generated frames, scored by the same rules)
         -> ranking.py   (Pearson / Spearman / MMRV / false-success rate, bootstrap intervals)
         -> cli.py       (``persistworld policy-eval``)
"""
