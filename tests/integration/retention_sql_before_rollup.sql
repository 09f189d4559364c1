WITH per_person AS (
    -- every person's active weeks (people as events_resolved stitches them)
    SELECT person_id,
           groupUniqArray(toDate(timestamp, {tz:String})
             - ((toDayOfWeek(toDate(timestamp, {tz:String})) + 7 - {week_start:UInt8}) % 7)) AS weeks
    FROM events_resolved
    WHERE timestamp >= {start:DateTime64(3, 'UTC')} - INTERVAL 14 DAY AND timestamp < {end:DateTime64(3, 'UTC')}
    GROUP BY person_id
)
SELECT toDateTime(week, {tz:String}) AS t,
       countIf(has(weeks, week) AND has(weeks, week - 7)) / countIf(has(weeks, week - 7)) AS retention_rate
FROM per_person
ARRAY JOIN arrayDistinct(arrayConcat(weeks, arrayMap(x -> x + 7, weeks))) AS week
WHERE week >= toDate({start:DateTime64(3, 'UTC')}, {tz:String})
  AND toDateTime(week, {tz:String}) < {end:DateTime64(3, 'UTC')}
GROUP BY week
HAVING countIf(has(weeks, week - 7)) > 0
ORDER BY week
