"""Host integrations: a loader for text-generation-webui (``textgen``) and a model container for
TabbyAPI (``tabby``).

Neither host has a plugin mechanism, so each integration is a launcher that patches the host's
modules by their documented names before the host starts (see ``docs/host-integrations`` in the
shared notes and the README's *Hosts* section). Nothing here imports a host module at import
time: the hosts' modules are imported lazily, inside the calls the hosts make.
"""
