"""ml_collections configs: `get_config(arg=None)` in each module (default, tiny, sweep, ...).

Pass one to a main by path (`--config=configs/default.py:dpa`) or import it (`from configs
import tiny`).
"""
