"""PeRL: parameter-efficient RL with verifiable rewards, on top of verl."""

__version__ = "0.1.0"
