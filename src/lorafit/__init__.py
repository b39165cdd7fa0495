from .errors import *  # placeholder
