"""kd-cvm: cervical vertebral maturation (CVM) staging on lateral cephalograms, for kdtoolkit."""

__version__ = "0.1.0"
