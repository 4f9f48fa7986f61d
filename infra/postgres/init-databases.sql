-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- one database per server, owned by POSTGRES_USER.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
