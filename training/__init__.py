"""What train.py and distill.py share: config, distributed setup, the loop, optimizer, logging.

Nothing here reads hydra or globals; entry points pass typed config objects down.
"""
