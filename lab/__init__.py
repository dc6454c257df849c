"""The development lab: a jobgate cluster on real systemd hosts, on one machine.

``python -m lab up`` (``make lab``) boots a scheduler and two worker hosts as
systemd-nspawn containers on a private network, installs the packages of
``make deb`` with ``ansible/site.yml`` and forwards a port of 127.0.0.1 to the
scheduler's API; ``python -m lab down`` takes it all away again. The appliance
tests (``tests/appliance/``) drive the same code. ``python -m lab.vagrant``
builds a Debian box for vagrant-libvirt and proves the ``Vagrantfile`` with a
real ``vagrant up``, inside a network namespace of its own.

Why a top-level package of its own: this is tooling for people working on
jobgate and for its tests, like ``bench/``. It needs root, systemd-nspawn and
Ansible, none of which a jobgate host has, so it is not part of the
distribution (``pyproject.toml`` packages only ``src/``), never reaches a
``.deb`` and is never imported by the services. It imports nothing of
jobgate's either: it runs with any Python 3.11, from the repository root.
"""
