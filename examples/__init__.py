"""Example task handlers: run one with ``TASK_HANDLER=examples.<module>:<callable>``."""
