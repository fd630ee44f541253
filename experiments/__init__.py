"""Studies made with jaxpeft; each folder holds one study's configs, driver and analysis."""
