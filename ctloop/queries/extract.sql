-- Extract: the source table's rows in [window_end - window_days days, window_end), exact duplicate rows dropped.
-- BigQuery Standard SQL, rendered by ctloop.sql.render_sql. Each placeholder (kind:name in double braces) names
-- how its value is validated and written: table = `project.dataset.table`, ident = a column name,
-- timestamp = a UTC TIMESTAMP literal, int = an integer literal.
-- Malformed rows stay (a NULL timestamp included): the transform quarantines and counts them.
-- `WHERE TRUE` is there because BigQuery accepts QUALIFY only alongside WHERE, GROUP BY or HAVING.
WITH windowed AS (
  SELECT
    source_row.*,
    TO_JSON_STRING(source_row) AS _ctloop_row_key
  FROM {{ table:source_table }} AS source_row
  WHERE source_row.{{ ident:timestamp_column }} IS NULL
    OR (
      source_row.{{ ident:timestamp_column }} >= TIMESTAMP_SUB({{ timestamp:window_end }}, INTERVAL {{ int:window_days }} DAY)
      AND source_row.{{ ident:timestamp_column }} < {{ timestamp:window_end }}
    )
)
SELECT * EXCEPT (_ctloop_row_key)
FROM windowed
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY {{ ident:id_column }}, {{ ident:timestamp_column }}, _ctloop_row_key) = 1
