"""Models elbolab did not build, behind its ``log_weights(x, k)`` protocol.

- :func:`elbolab.adapters.pythae.from_pythae`: pythae's VAE, BetaVAE, IWAE, MIWAE, PIWAE,
  CIWAE and VAMP (``pip install 'elbolab[pythae]'``);
- :func:`elbolab.adapters.pyro.from_pyro`: a Pyro model + guide pair (``pip install 'elbolab[pyro]'``).

Each adapter is a :class:`~elbolab.models.base.LatentVariableModel`, so ``elbolab.evaluate``,
``elbolab.diagnose``, the bounds and the gradient estimators read it like a model of
elbolab's own. The libraries are imported when an adapter is built, not here, so elbolab
installs and imports without them.
"""
