"""Host adapters: the only place that knows about the AUTOMATIC1111 WebUI (``webui``) or its absence
(``standalone``). Only ``webui`` imports the WebUI's ``modules``."""
