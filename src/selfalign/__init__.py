"""selfalign: SELF-ALIGN (Sun et al., 2023, arXiv 2305.03047) as a package and a command-line tool."""

__version__ = "0.1.0"
