"""fastlsm's backends: :mod:`fastlsm.backends.base` (the protocol, the registry and device
selection) and one package per backend (``cpu``, ``cuda``, ``dask``), imported on first use."""
