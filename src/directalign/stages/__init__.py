"""The five pipeline stages; each ``run`` returns store artifacts for the next one."""
