# The webui's native loader imports the exllamav3 package, which this environment does not have.
from exllamav3 import Config  # noqa: F401
