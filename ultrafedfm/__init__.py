"""UltraFedFM: federated masked-autoencoder pretraining of an ultrasound foundation model.

The core (``data``, ``models``, ``train``, ``secagg``, ``privacy``) is framework-free;
``ultrafedfm.flare`` holds the thin NVIDIA FLARE adapters.
"""

__version__ = "0.1.0"
