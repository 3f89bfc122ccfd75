import logging

logger = logging.getLogger("text-generation-webui")
