// Package postgres is a store.Backend kept in a PostgreSQL database.
package postgres
