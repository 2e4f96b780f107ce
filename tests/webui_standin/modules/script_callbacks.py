"""Stand-in of modules/script_callbacks.py: callbacks are recorded and run by the test like the WebUI would."""

callbacks_ui_tabs: list = []
callbacks_ui_settings: list = []
callbacks_app_started: list = []
callbacks_model_loaded: list = []
callbacks_script_unloaded: list = []


def on_ui_tabs(callback):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback):
    callbacks_ui_settings.append(callback)


def on_app_started(callback):
    callbacks_app_started.append(callback)


def on_model_loaded(callback):
    callbacks_model_loaded.append(callback)


def on_script_unloaded(callback):
    callbacks_script_unloaded.append(callback)


def ui_settings_callback():
    for callback in callbacks_ui_settings:
        callback()
