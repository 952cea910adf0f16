DROP TABLE gateway_settings;
