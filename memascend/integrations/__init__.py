"""Integrations of memascend with training frameworks (see :mod:`.deepspeed`)."""
