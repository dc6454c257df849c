"""Development tooling: the local cluster of ``make run`` and the tests.

It may import every other package (it starts the services and shares their
helpers); none of them imports it (``tests/unit/test_layers.py``). The
development CA is ``certs/devca.py``; the multi-host lab is ``lab/``.
"""
