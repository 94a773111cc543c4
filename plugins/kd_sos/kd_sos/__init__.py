"""kd-sos: the spheno-occipital synchondrosis (SOS) staging plugin for kdtoolkit."""

__version__ = "0.1.0"
