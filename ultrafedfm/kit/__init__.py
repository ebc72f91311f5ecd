"""Consortium kits: who is in the consortium, their certificates, and a site's pre-flight check.

Framework-free except for :mod:`ultrafedfm.kit.provisioning`, which runs FLARE's provisioner
with our kit builder. Hospital IT meets this package through ``ultrafedfm kit ...``.
"""
