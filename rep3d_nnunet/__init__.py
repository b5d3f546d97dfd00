"""Rep3D for nnU-Net v2: large depthwise 3D kernels trained through a learned spatial prior (LRBM).

Data flows one way through the modules: ``config`` (plans -> Rep3D settings) -> ``architecture``
(network) -> ``training`` (trainer hooks) -> ``export`` (fold the generator away) -> nnU-Net's predictor.
"""

__version__ = "0.1.0"
