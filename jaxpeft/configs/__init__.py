"""Each registered method's defaults per task: ``<method>.py`` with ``get_config(task) -> dict``.

Shipped inside the package, so a non-editable install finds them (``jaxpeft.config.method_config_file``);
a registered method without a config here is an error, never a silent fall-back.
"""
