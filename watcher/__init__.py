"""productiv-watcher: uploads every finished file of a drop folder to Productiv's push API."""

__version__ = "0.1.0"
