"""The start-up hook of ``memascend run`` (see :mod:`..launch`): a folder put on ``PYTHONPATH``
so that every Python process of the command imports its ``sitecustomize``."""
