"""ektp-monitor agent: checks an e-KTP recording kit and publishes its health over MQTT."""

__version__ = "0.1.0"
