-- How the site checks a resource's target: NULL = TCP connect, 'http:/PATH' = HTTP GET.
ALTER TABLE resources ADD COLUMN health_check TEXT;
