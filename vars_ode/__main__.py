"""``python -m vars_ode``: the offline demo (see :mod:`vars_ode.demo`)."""
from .demo import main

main()
