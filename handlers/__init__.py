"""Task handlers of this deployment: name one with ``TASK_HANDLER=handlers.<module>:<callable>``.

This package is copied into the container image (see the Dockerfile), so a
handler placed here runs the same under ``make run`` and in the container.
"""
