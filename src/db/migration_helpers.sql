-- Helpers every migration may call, installed by provisiond's migration runner (src/db/migrate.rs)
-- inside the migration transaction as session-temporary functions: they never become part of the
-- schema, and a migration names them `pg_temp.<name>(...)`. The rules they serve are in
-- docs/MIGRATIONS.md: a migration creates only what is missing, so that it runs the same on an
-- empty database and on one where the web app already created the seed's tables.

-- Creates an enum type unless a type of that name exists. An adopted database keeps its own type
-- as it is (the preflight checked that it has the labels the daemon writes); labels are never
-- added here.
CREATE FUNCTION pg_temp.ensure_enum(type_name text, labels text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF to_regtype(type_name) IS NULL THEN
        EXECUTE format('CREATE TYPE %I AS ENUM (%s)', type_name,
            (SELECT string_agg(quote_literal(l), ', ' ORDER BY i)
             FROM unnest(labels) WITH ORDINALITY AS u(l, i)));
    END IF;
END $$;

-- Adds a constraint unless the table has one of that name, or (for UNIQUE, PRIMARY KEY and
-- FOREIGN KEY) one with the same definition under another name: the web app's Drizzle names its
-- `UNIQUE (stripe_event_id)` and its foreign keys its own way, and a second copy would only cost
-- an index and a check. For that comparison `definition` must be written exactly as
-- pg_get_constraintdef prints it; one that is not is refused here, with the text to write.
CREATE FUNCTION pg_temp.ensure_constraint(table_name regclass, constraint_name text,
                                          definition text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    comparable boolean := definition ~ '^(UNIQUE|PRIMARY KEY|FOREIGN KEY) ';
    actual text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = table_name
                 AND (conname = constraint_name
                      OR (comparable AND pg_get_constraintdef(oid) = definition))) THEN
        RETURN;
    END IF;
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', table_name, constraint_name, definition);
    IF comparable THEN
        SELECT pg_get_constraintdef(oid) INTO actual
        FROM pg_constraint WHERE conrelid = table_name AND conname = constraint_name;
        IF actual IS DISTINCT FROM definition THEN
            RAISE EXCEPTION 'pg_temp.ensure_constraint(%, %): write the definition as PostgreSQL prints it: %',
                table_name, constraint_name, actual;
        END IF;
    END IF;
END $$;
