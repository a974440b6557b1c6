"""Meta-training Celo2's weights with persistent evolution strategies (PES).

    python scripts/metatrain.py --config configs/metatrain/smoke.yaml

config.py (settings), pes.py (the estimator), tasks*.py (task families),
population.py (a family's particles), checkpoint.py (save/resume),
loop.py (the outer loop).
"""
